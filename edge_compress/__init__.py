"""edge_compress: compress, lower, export, profile and fit compact object detectors for edge devices.

Subpackages: ``models`` (zoo, post-process, summary), ``data`` (COCO loader,
synthetic set), ``train``, ``eval`` (pycocotools mAP), ``cli``; ``backends``
and ``kernels`` are installed from the top-level folders of the same names.
"""

__version__ = "0.1.0"
