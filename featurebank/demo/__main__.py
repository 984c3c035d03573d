import sys

from featurebank.demo.run import main

sys.exit(main())
