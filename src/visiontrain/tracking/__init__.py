"""Writers of run logs: JSONL, TensorBoard, terminal progress."""
