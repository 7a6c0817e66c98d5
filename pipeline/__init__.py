"""The contract both stages share, and stage one with its tools.

Top level, imported by ``student/`` too: ``sources`` (what a sample is and where its bytes are),
``recipes`` (the augmentation recipe as data), ``views`` (the view plan: seeds to pixels, windows,
the epoch stream), ``probes`` (fixed views that catch a drifted renderer) and ``options`` (value
types every CLI option is checked with). ``stage1/`` runs the teacher; ``tools/`` looks at stores.
Nothing here imports ``student/``.
"""
