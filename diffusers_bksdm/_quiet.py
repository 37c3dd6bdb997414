"""Library notices that are noise for this package's use, dropped where we cause them.

- diffusers warns on every dtype cast of a model with `to()` that "there are modules ... that should be kept in
  float32", also when that list is empty (nothing is kept in float32, so nothing can go wrong): the empty-list
  warning is dropped, a non-empty one still shows.
- transformers says that an image processor "requires torchvision (not installed)" and falls back to its PIL
  version whenever diffusers imports a pipeline module; this package never needs the torchvision backend.

Only these messages are dropped (a logging filter on the two loggers that emit them); everything else passes.
"""

from __future__ import annotations

import logging

__all__ = ["silence_library_noise"]

_NOISE = {
    "diffusers.models.modeling_utils": ("that should be kept in float32: [].",),
    "transformers.utils.import_utils": ("requires torchvision (not installed)",),
}


class _DropNoise(logging.Filter):
    def __init__(self, fragments: tuple[str, ...]):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record is not ours to judge
            return True
        return not any(fragment in message for fragment in self.fragments)


def silence_library_noise() -> None:
    """Install the filters (idempotent; cheap: imports neither diffusers nor transformers)."""
    for name, fragments in _NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in logger.filters):
            logger.addFilter(_DropNoise(fragments))
