"""Every error class of ours derives from storage.errors.UserError, so cli.py's one handler prints it as
one line with exit code 2; a new class on another base would escape as a traceback."""

import importlib
import inspect
import pkgutil

import pytest

from storage.errors import UserError

PACKAGES = ("storage", "pipeline", "student")


def _our_modules():
    names = ["demo"]
    for pkg in PACKAGES:
        mod = importlib.import_module(pkg)
        names += [m.name for m in pkgutil.walk_packages(mod.__path__, prefix=pkg + ".")]
    return names


def _error_classes():
    found = {}
    for name in _our_modules():
        mod = importlib.import_module(name)
        for _, obj in inspect.getmembers(mod, inspect.isclass):
            if issubclass(obj, BaseException) and obj.__module__ == name:
                found[f"{name}.{obj.__name__}"] = obj
    return found


def test_the_walk_finds_the_known_errors():
    names = set(_error_classes())
    for expected in ("storage.spec.StoreError", "pipeline.source_errors.SourceError", "student.errors.TrainError",
                     "pipeline.stage1.teacher_runtime.TeacherError", "demo.DemoError"):
        assert expected in names


@pytest.mark.parametrize("name", sorted(_error_classes()))
def test_every_error_is_a_user_error(name):
    assert issubclass(_error_classes()[name], UserError), f"{name} does not derive from storage.errors.UserError"


def test_source_errors_are_not_value_errors():
    """The source readers turn Python's ValueError (int() of a .cls, JSON, pyarrow) into SourceErrors; a
    SourceError that were a ValueError too would be swallowed by those handlers, or need an
    ``except SourceError: raise`` guard ahead of each."""
    from pipeline.sources import ManifestError, SourceChanged, SourceError

    for cls in (SourceError, SourceChanged, ManifestError):
        assert not issubclass(cls, ValueError), cls.__name__
