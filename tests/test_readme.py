"""The README as a newcomer reads it (issue #20, trap 8): the quick start comes first, before any
research detail; it points at no folder a user does not have; every link it gives resolves."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")


def test_the_quick_start_is_the_first_section_after_a_short_introduction():
    sections = re.findall(r"^## (.+)$", README, flags=re.M)
    assert sections[0].startswith("Quick start") and sections[1] == "Documentation"
    introduction = README.split("\n## ", 1)[0]
    assert len(introduction.splitlines()) <= 10 and "|" not in introduction  # no tables before it


def test_no_command_points_at_this_projects_own_data_folder():
    assert "../shared" not in README


def test_every_relative_link_resolves():
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README)
    local = [link for link in links if not link.startswith(("http://", "https://"))]
    assert local, "no relative links found: the pattern is wrong"
    assert [link for link in local if not (REPO / link).exists()] == []
