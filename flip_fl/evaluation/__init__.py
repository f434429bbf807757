"""How a global model is judged: clean accuracy, attack success rate, low-confidence rejection, detection.

- `metrics`: thresholded accuracy / ASR as pure functions of predicted probabilities;
- `evaluator`: `GlobalEvaluator`, the server's per-round evaluation on clean and triggered test images;
- `detection`: a defense's rejections scored as detection of the attacking clients.
"""
