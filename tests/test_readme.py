"""The README's promises: its code runs, and CI runs its test command."""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_python_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert len(blocks) >= 2
    namespace = {}
    for block in blocks:  # later blocks use names from earlier ones
        exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["logits"].shape == (10, 1000)
    assert namespace["mixed"].shape == (10, 49, 64)


def test_ci_runs_the_readme_test_command():
    commands = re.findall(r"^(make \w+)\s+# set up and run the test suite", README, flags=re.M)
    assert commands == ["make test"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, flags=re.M)
