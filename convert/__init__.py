"""edge-inspect trainer/converter: dataset -> Keras -> full-integer int8 TFLite bundle."""
