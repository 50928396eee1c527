"""Capture: module calls as pytrees, the graphs and shape ranges learned from them, the recorder, and the
flat function of tensors that exporters trace."""
