"""``python -m onnxsqueeze`` runs the CLI."""

from onnxsqueeze.cli import main

raise SystemExit(main())
