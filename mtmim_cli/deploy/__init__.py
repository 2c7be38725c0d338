"""Everyday use of a trained model: verification threshold, embeddings, ONNX export."""
