"""The README's Python quickstart is executed, so it cannot drift from the API."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_quickstart_runs(capsys):
    text = README.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README has no python block"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md quickstart", "exec"), namespace)
    result = namespace["result"]
    # the documented contract of the result
    assert result.scores.shape == (len(namespace["train"]),)
    assert len(result.causes) > 0
    assert (result.scores[result.causes] > 0).all()  # positive = harmful
    c = result.culprits(0, n=5)
    assert len(c.indices) == 5 and (c.scores[:-1] >= c.scores[1:]).all()
    assert result.model is not namespace["model"]
    assert "test_acc" in capsys.readouterr().out
