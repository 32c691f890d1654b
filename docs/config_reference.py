"""Write the key tables of config/README.md from the JSON schemas (the single source of truth).

Run ``python docs/config_reference.py`` after editing a schema; tests/test_docs.py fails while the
README is out of date.
"""

from __future__ import annotations

from pathlib import Path

from rbflow.config import schema

REPO = Path(__file__).resolve().parents[1]
README = REPO / "config" / "README.md"
MARKER = "<!-- generated from src/rbflow/schemas by docs/config_reference.py: do not edit below -->"
SECTIONS = [
    ("telescope", "Telescope file (`config/telescopes/<name>.yaml`)"),
    ("sky", "Synthetic sky (`sky:` block of a demo telescope)"),
    ("config", "Run configuration (`config/config.yaml`)"),
]


def _rows(schema: dict, prefix: str = ""):
    for key, sub in schema.get("properties", {}).items():
        kind = sub.get("type", "")
        kind = "/".join(kind) if isinstance(kind, list) else kind
        desc = " ".join(sub.get("description", "").split()).replace("|", "\\|")
        yield f"| `{prefix}{key}` | {kind} | {desc} | `{sub.get('default', '—')}` |"
        yield from _rows(sub, prefix + key + ".")


def tables() -> str:
    """The generated part of config/README.md."""
    parts = [MARKER]
    for name, title in SECTIONS:
        parts.append(f"\n## {title}\n\n| key | type | meaning (unit) | default |\n|---|---|---|---|")
        parts.extend(_rows(schema(f"{name}.schema.yaml")))
    return "\n".join(parts) + "\n"


def main() -> None:
    """Rewrite the generated part of config/README.md."""
    head = README.read_text().split(MARKER)[0]
    README.write_text(head + tables())


if __name__ == "__main__":
    main()
