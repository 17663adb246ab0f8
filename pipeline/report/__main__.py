import sys

from pipeline.report import main

sys.argv[0] = "report.py"  # argparse's usage and error lines name the program after it: the stage, not __main__.py
main()
