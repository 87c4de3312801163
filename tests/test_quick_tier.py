"""The quick tier (`bash scripts/test.sh --quick`, tests marked quick) keeps covering every test module: a new
module without a quick test fails here, naming it."""
import ast
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent


def _quick_tests(path: Path) -> list:
    """Names of the test functions in ``path`` marked ``@pytest.mark.quick`` (or the whole module, through
    ``pytestmark``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    module_marked = any(isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "pytestmark"
                                                             for t in node.targets)
                        and "quick" in ast.unparse(node.value) for node in tree.body)
    tests = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")]
    return [t.name for t in tests if module_marked or any("mark.quick" in ast.unparse(d) for d in t.decorator_list)]


@pytest.mark.quick
def test_every_test_module_has_a_quick_test():
    modules = sorted(TESTS.glob("test_*.py"))
    assert len(modules) > 30
    missing = [path.name for path in modules if not _quick_tests(path)]
    assert missing == [], f"no test marked @pytest.mark.quick in: {', '.join(missing)}"


def test_the_check_sees_marks(tmp_path):
    marked = tmp_path / "test_a.py"
    marked.write_text("import pytest\n\n@pytest.mark.quick\ndef test_x():\n    pass\n\ndef test_y():\n    pass\n")
    unmarked = tmp_path / "test_b.py"
    unmarked.write_text("def test_x():\n    pass\n")
    whole = tmp_path / "test_c.py"
    whole.write_text("import pytest\npytestmark = [pytest.mark.quick]\n\ndef test_x():\n    pass\n")
    assert (_quick_tests(marked), _quick_tests(unmarked), _quick_tests(whole)) == (["test_x"], [], ["test_x"])
