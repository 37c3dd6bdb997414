"""The miniature world: tiny local teachers, the shapes data, its judge and the shipped trained teacher; `demo`
holds the flow of `bksdm demo` (`run_demo`)."""
