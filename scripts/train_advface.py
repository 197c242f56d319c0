"""Train the AdvFace decoders: the command line of :mod:`fluxguard.features.training` (see its docstring).

    python scripts/train_advface.py prepare --data ../shared/faces
    python scripts/train_advface.py embed --models mobileface
    python scripts/train_advface.py train --role shadow --model mobileface --steps 300
    python scripts/train_advface.py export --role shadow --model mobileface
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from fluxguard.features.training import main  # noqa: E402

if __name__ == "__main__":
    main()
