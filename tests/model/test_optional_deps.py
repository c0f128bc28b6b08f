"""The model layer's optional packages fail with a message naming the extra that installs them."""

from __future__ import annotations


from helpers import run_python


def test_missing_extras_name_the_extra():
    # block the optional packages (None in sys.modules makes `import x` raise ImportError)
    out = run_python(
        "import sys\n"
        "for m in ('safetensors', 'matplotlib', 'tokenizers'): sys.modules[m] = None\n"
        "msgs = []\n"
        "try:\n"
        "    import compass_model\n"
        "except ImportError as e:\n"
        "    msgs.append(str(e))\n"
        "del sys.modules['safetensors']\n"
        "for m in [m for m in sys.modules if m.startswith('compass_model')]: del sys.modules[m]\n"
        "from compass_model.train import plots\n"
        "from compass_model.data.tokenizer import HFTokenizer\n"
        "for f in (plots.pyplot, lambda: HFTokenizer('tok.json')):\n"
        "    try:\n"
        "        f()\n"
        "    except ImportError as e:\n"
        "        msgs.append(str(e))\n"
        "print('\\n'.join(msgs))\n")
    msgs = out.strip().splitlines()
    assert len(msgs) == 3, out
    for msg, extra, pkg in zip(msgs, ("model", "plots", "model"), ("safetensors", "matplotlib", "tokenizers")):
        assert f"pip install 'compass-kernels[{extra}]'" in msg and f"'{pkg}'" in msg, msg
