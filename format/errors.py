"""The format layer's error: one line naming the file, the tensor and the fix."""


class CheckpointError(ValueError):
    """A SPON checkpoint or model directory is missing, malformed, of an unsupported architecture, or does not
    belong to the model it is used with."""
