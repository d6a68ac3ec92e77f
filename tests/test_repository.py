"""The repository stands alone: cited quirk IDs and SPEC sections resolve in docs/SPEC.md, the golden
cases in tests/golden match their manifest, and nothing points outside the repository."""
import json
import os
import re

import pytest

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS_DIR)
SPEC = os.path.join(ROOT, "docs", "SPEC.md")
GOLDEN = os.path.join(TESTS_DIR, "golden")  # the repository's copy, whatever GOLDEN_DIR says
QUIRK_ID = re.compile(r"\b(?:IL|S3N|MC|CL)-[0-9]+\b")
SECTION_CITE = re.compile(r"§ ?([0-9]+(?:\.[0-9]+)?)")
OUTSIDE = "../shared"


def _repo_files(suffix, under=""):
    """Relative paths (with '/') of the repository's files ending in ``suffix``, below ``under``."""
    found = []
    for folder, dirs, files in os.walk(os.path.join(ROOT, under)):
        dirs[:] = sorted(d for d in dirs
                         if not d.startswith(".") and d != "__pycache__" and not d.endswith(".egg-info"))
        found += [os.path.relpath(os.path.join(folder, f), ROOT).replace(os.sep, "/")
                  for f in sorted(files) if f.endswith(suffix)]
    return found


def _read(relative):
    with open(os.path.join(ROOT, relative), encoding="utf-8") as f:
        return f.read()


def _spec_quirk_index():
    text = _read("docs/SPEC.md")
    assert "\n## Quirk index\n" in text, "docs/SPEC.md has no '## Quirk index' section"
    return text.split("\n## Quirk index\n", 1)[1].split("\n## ", 1)[0]


def _cited(pattern):
    """{match: [files citing it]} over the repository's .py files."""
    cited = {}
    for path in _repo_files(".py"):
        for match in pattern.findall(_read(path)):
            cited.setdefault(match, []).append(path)
    return cited


def test_every_cited_quirk_id_is_in_the_spec_quirk_index():
    cited = _cited(QUIRK_ID)
    assert cited, "no quirk IDs found: is the repository walk broken?"
    index = set(QUIRK_ID.findall(_spec_quirk_index()))
    missing = {q: sorted(set(files)) for q, files in cited.items() if q not in index}
    assert not missing, "quirk IDs cited but not in docs/SPEC.md's Quirk index: %s" % missing


def test_quirk_index_lists_only_ids_defined_in_the_golden_manifest():
    with open(os.path.join(GOLDEN, "MANIFEST.md"), encoding="utf-8") as f:
        defined = set(re.findall(r"^- \*\*((?:IL|S3N|MC|CL)-[0-9]+)\*\*", f.read(), re.M))
    listed = set(re.findall(r"^- \*\*((?:IL|S3N|MC|CL)-[0-9]+)\*\*", _spec_quirk_index(), re.M))
    assert listed, "the Quirk index has no '- **ID**' entries"
    assert listed <= defined, "not defined in tests/golden/MANIFEST.md: %s" % sorted(listed - defined)


def test_cited_spec_sections_exist():
    headings = set(re.findall(r"^#{2,3} ([0-9]+(?:\.[0-9]+)?)[. ]", _read("docs/SPEC.md"), re.M))
    missing = {s: sorted(set(files)) for s, files in _cited(SECTION_CITE).items() if s not in headings}
    assert not missing, "sections cited but not in docs/SPEC.md: %s" % missing


def test_golden_manifest_and_case_files_agree():
    with open(os.path.join(GOLDEN, "MANIFEST.json"), encoding="utf-8") as f:
        listed = [case["file"] for case in json.load(f)["cases"]]
    present = sorted(f for f in os.listdir(GOLDEN) if f.endswith(".npz"))
    assert len(listed) == len(set(listed)), "files listed twice in MANIFEST.json"
    absent = sorted(set(listed) - set(present))
    unlisted = sorted(set(present) - set(listed))
    assert not absent, "in MANIFEST.json but not in tests/golden: %s" % absent
    assert not unlisted, "in tests/golden but not in MANIFEST.json: %s" % unlisted
    assert os.path.isfile(os.path.join(GOLDEN, "MANIFEST.md"))


def _checked_files():
    this = os.path.relpath(os.path.abspath(__file__), ROOT).replace(os.sep, "/")
    files = _repo_files(".py") + _repo_files(".md", "docs") + [f for f in ("README.md",)
                                                               if os.path.isfile(os.path.join(ROOT, f))]
    return [f for f in files if f != this]


def test_nothing_refers_outside_the_repository():
    offenders = [f for f in _checked_files() if OUTSIDE in _read(f)]
    assert not offenders, "files referring to %s: %s" % (OUTSIDE, offenders)
