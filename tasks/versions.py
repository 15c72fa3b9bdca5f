"""The versions that enter keys, in one place: bump one when what it names changes the stored bytes, and every
result made under the old rule is found stale by key. What each value changed: docs/design.md, "Versions that
enter keys"."""

READ_RULES = 2  # how input files are read into rows (inputs.py); enters the inputs fingerprint
INGEST_RULES = 3  # row validation and tokenisation (validate.py, ingest.py); enters the tokenization key
PARTS_VERSION = 5  # the layout of ingest's Parquet parts (ingest.py); enters the parts' directory key
TEMPLATE_NAME = "tulu-v2/open-instruct-r2"  # the Tulu template (template.py)
MODEL_TEMPLATE_RULE = "generated-v4"  # how response spans are found in a model template's text (template.py)
SELECTION_RULES = {"local": "largest-remainder-exact"}  # per method, where its rule departs from the first
METRICS_VERSION = "loss+cloze+generated-v3"  # the evaluation's metrics (evaluate.py); enters eval keys
BUILD_VERSION = 2  # the embedded demo's build (embedded.py); enters its cache key
