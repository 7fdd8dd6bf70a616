"""The model where it runs outside PyTorch: onnx_model (an export.py ONNX file opened with
onnxruntime, checked to be one, and run on uint8 images or as a module evaluate.py measures) and
quantize (int8 with onnxruntime.quantization, calibrated on training images). Uses data.py,
model.py and files/; the packages come from requirements-optional.txt.
"""
