"""Narration helpers shared by the demos in tests/demo/: each step says what
it shows and checks it; a step that does not behave as shown fails the demo."""
import os
import sys
import textwrap


class DemoFailed(Exception):
    pass


def step(n, title, why):
    print("\n== %d. %s" % (n, title))
    print(textwrap.indent(textwrap.fill(why, 76), "   "))


def show(label, value):
    print("   %-22s %s" % (label + ":", value))


def check(cond, what):
    if not cond:
        raise DemoFailed(what)
    print("   ok: " + what)


def use_build_dir(argv, source_dir):
    """Point the harness at the binaries and stubs of the build dir in argv."""
    if len(argv) != 2:
        sys.exit("usage: %s BUILD_DIR" % argv[0])
    build = os.path.abspath(argv[1])
    os.environ.setdefault("TPMKMSD", os.path.join(build, "agent", "tpmkmsd"))
    os.environ.setdefault("TPMKMSCTL", os.path.join(build, "agent", "tpmkmsctl"))
    stubs = os.path.join(build, "tests", "e2e", "stubs")
    if os.path.isdir(stubs):
        os.environ.setdefault("TPMKMS_STUBS", stubs)
    os.environ.setdefault("TPMKMS_SOURCE_DIR", source_dir)
    for b in ("TPMKMSD", "TPMKMSCTL"):
        if not os.access(os.environ[b], os.X_OK):
            sys.exit("%s not found: build first (cmake -B %s && cmake --build %s)"
                     % (os.environ[b], build, build))
