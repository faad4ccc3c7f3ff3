"""Export a trained model: pt2 and ONNX writers, the fresh-process check, model.json."""
