"""The README's example runs as written."""

import pathlib
import re

ROOT = pathlib.Path(__file__).parents[1]


def test_readme_example_runs(capsys):
  text = (ROOT / "README.md").read_text()
  match = re.search(r"<!-- readme-example[^>]*-->\s*```python\n(.*?)```", text, re.S)
  assert match, "README example block not found"
  code = match.group(1)
  assert len(code.strip().splitlines()) <= 14
  exec(compile(code, "README.md", "exec"), {})  # pylint: disable=exec-used
  out = capsys.readouterr().out
  assert re.match(r"loss \d+\.\d+ \(4, 16\)", out), out


def test_readme_opens_with_the_two_commands():
  text = (ROOT / "README.md").read_text()
  first_block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
  commands = [line.split("#")[0].strip() for line in first_block.splitlines()]
  assert commands == ["make quickstart", "make test"]
  assert "make test" in (ROOT / ".ci" / "run").read_text()
