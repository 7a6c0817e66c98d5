"""Tools that look at a label store: ``inspect`` (``summary``, ``sample``, ``render``, ``export``) and
``verify`` (recompute views with the teacher and compare), sharing ``lookup`` (the source behind a
store, a sample by key, the slots it fills, class names)."""
