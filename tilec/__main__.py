from tilec.cli import main

raise SystemExit(main())
