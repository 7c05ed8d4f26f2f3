"""``python -m softprompt`` is the same command as ``softprompt``."""

from softprompt.cli import main

raise SystemExit(main())
