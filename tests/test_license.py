"""The package declares Apache-2.0 and ships the license's text."""

import hashlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# md5 of https://www.apache.org/licenses/LICENSE-2.0.txt, the standard text (appendix included)
APACHE_2_0_MD5 = "3b83ef96387f14655fc854ddc3c6bd57"


def test_the_declared_license_ships_as_its_standard_text():
    assert 'license = { text = "Apache-2.0" }' in (ROOT / "pyproject.toml").read_text()
    text = (ROOT / "LICENSE").read_bytes()
    assert b"Apache License\n                           Version 2.0, January 2004" in text
    assert hashlib.md5(text).hexdigest() == APACHE_2_0_MD5
