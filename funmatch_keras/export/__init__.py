"""Export: the student as `.keras`, SavedModel, TFLite and ONNX, each checked for parity.

- `formats`: `export_all` and one writer per format, all or nothing;
- `onnx`: ONNX through Keras's `model.export(format="onnx")` (the `[onnx]` extra);
- `verify`: runs each artifact the way it is deployed, and the parity report.

Example:
>>> import funmatch_keras as fm
>>> "tflite_int8" in fm.export.FORMATS
True
"""

from funmatch_keras.export.formats import (
                                           FORMATS,
                                           REPORT_NAME,
                                           ExportError,
                                           export_all,
                                           to_keras,
                                           to_saved_model,
                                           to_tflite,
)
from funmatch_keras.export.verify import format_report

# Not `verify` itself: that name is the module (`fm.export.verify.verify`).
__all__ = ["FORMATS", "REPORT_NAME", "ExportError", "export_all", "format_report",
           "to_keras", "to_saved_model", "to_tflite"]
