"""Print the key-results table of data/results.json as the notebook's first code cell makes it
(`key_results_table`, read from vnca_reproduction.py); with --check, fail unless README.md holds it."""
import ast
import json
import sys
from pathlib import Path

root = Path(__file__).resolve().parent.parent
source = (root / "vnca_reproduction.py").read_text()
[function] = [node for node in ast.parse(source).body
              if isinstance(node, ast.FunctionDef) and node.name == "key_results_table"]
namespace: dict = {}
exec(compile(ast.Module([function], []), "vnca_reproduction.py", "exec"), namespace)
table = namespace["key_results_table"](json.loads((root / "data" / "results.json").read_text()))
if "--check" in sys.argv:
    if table not in (root / "README.md").read_text():
        sys.exit("README.md's key-results table is not the one data/results.json gives: "
                 "paste the output of `python .ci/readme_table.py` into it.")
    print("README.md's key-results table matches data/results.json")
else:
    print(table)
