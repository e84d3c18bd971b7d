import sys

print("run one of: python -m simulators.caller | python -m simulators.village", file=sys.stderr)
sys.exit(2)
