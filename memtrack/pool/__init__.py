"""Worker pools: the shared worker table (:mod:`.table`), the memory-aware executor
(:mod:`.executor`) and what a dead worker left behind (:mod:`.forensics`)."""
