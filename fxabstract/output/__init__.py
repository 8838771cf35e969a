"""What fxabstract writes: the JSON report, files written atomically, the summary plot, ONNX export,
and saving / loading a compiled module without pickled code."""
