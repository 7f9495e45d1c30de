"""setup.py's minimum versions are the ones .ci/minimums installs and tests."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_install_requires_minimums_match_the_tested_pins():
    setup = (ROOT / "setup.py").read_text()
    block = re.search(r"install_requires=\[(.*?)\]", setup, re.S).group(1)
    stated = dict(re.findall(r'"([A-Za-z0-9_.-]+)>=([0-9.]+)"', block))
    names = re.findall(r'"([A-Za-z0-9_.-]+)[<>=!~]*[0-9.]*"', block)
    assert set(names) == set(stated), f"every runtime dependency states a minimum: {names}"
    pins = {}
    for line in (ROOT / ".ci/minimums.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[name] = version
    assert set(pins) == set(stated)
    padded = lambda v: tuple(int(x) for x in v.split(".")) + (0,) * (3 - v.count(".") - 1)  # noqa: E731
    for name, minimum in stated.items():
        assert padded(pins[name]) == padded(minimum), f"{name}: setup.py says >={minimum}, .ci/minimums tests {pins[name]}"
