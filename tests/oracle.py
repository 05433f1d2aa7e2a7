from ddlm.eval.oracle import *  # noqa: F403 -- moved to ddlm/eval/oracle.py; kept for the tests that import it
