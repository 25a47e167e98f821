from cnnpipe.cli import main

raise SystemExit(main())
