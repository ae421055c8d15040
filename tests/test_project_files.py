"""The project's own files agree with each other: README commands, CI, Space metadata,
the settings listed in .env.example."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _bash_blocks(text: str) -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, re.S)]


def test_readme_starts_with_the_two_commands_and_ci_runs_the_test_command_verbatim():
    before_first_section = README.split("\n## ", 1)[0]
    run_app, run_tests = _bash_blocks(before_first_section)[:2]
    assert "pip install -r requirements.txt" in run_app and run_app.endswith("python app.py")
    assert "requirements-dev.txt" in run_tests and "pytest" in run_tests
    assert run_tests in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert "apt-get install -y -qq chromium" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")


def test_space_metadata_matches_the_pinned_gradio():
    front = README.split("---")[1]
    pinned = re.search(r"^gradio==([\w.]+)$", (ROOT / "requirements.txt").read_text(), re.M).group(1)
    assert re.search(rf"^sdk_version: {re.escape(pinned)}$", front, re.M)
    assert re.search(r"^app_file: app.py$", front, re.M) and re.search(r"^sdk: gradio$", front, re.M)


def test_every_setting_the_app_reads_is_in_env_example():
    example = (ROOT / ".env.example").read_text(encoding="utf-8")
    listed = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]+)=", example, re.M))
    config = (ROOT / "avatar_core" / "config.py").read_text(encoding="utf-8")
    read = set(re.findall(r"\"((?:AVATAR|WAVESPEED|SEGMIND|FAL|REPLICATE|KLING)_[A-Z0-9_]+)\"", config))
    assert read and read <= listed, sorted(read - listed)
