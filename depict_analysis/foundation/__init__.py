"""The foundation both layers stand on: the error hierarchy, atomic files, the device, progress bars.

``depict_analysis.models`` (the segmentation stack) and the analyses import these; this package
imports nothing else of the project, so a pure maths module can raise a ``DepictError`` without
loading the model stack.
"""
