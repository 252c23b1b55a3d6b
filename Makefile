# Entry points for people; the scripts do the work.
#   make demo                          the quickstart (scripts/demo): the whole system on this machine, a failover
#   make demo DEMO_FLAGS=--failback    ... and the failback to OpenAI once it recovers (~30 s more)
#   make demo DEMO_FLAGS=--keep        leave it running; `make demo-stop` stops it
#   make test                          the test suite against the test control plane (scripts/test)

DEMO_FLAGS ?=

.PHONY: demo demo-stop test

demo:
	@scripts/demo $(DEMO_FLAGS)

demo-stop:
	@scripts/demo --stop

test:
	scripts/test
