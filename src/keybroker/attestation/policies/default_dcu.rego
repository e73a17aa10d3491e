# Keybroker default attestation policy for Hygon DCU accelerators (policy id "default", class
# "dcu": EAR submods dcu0, dcu1, ...).
#
# Upstream Trustee's verifier gives DCU claims the class "dcu" but ships no default_dcu policy;
# this one follows the shape of default_gpu. Reference value ids (ours): hygondcu_measure (the
# firmware measurement), hygondcu_version (the report's firmware version). A DCU has no
# configuration a report describes, so configuration stays 36 (unknown).
package policy

import rego.v1

default hardware := 97

default configuration := 36

default executables := 33

trust_claims := {
	"instance-identity": 0,
	"configuration": configuration,
	"executables": executables,
	"file-system": 0,
	"hardware": hardware,
	"runtime-opaque": 0,
	"storage-opaque": 0,
	"sourced-data": 0,
}

hardware := 2 if {
	input.hygondcu.body.version in query_reference_value("hygondcu_version")
}

executables := 3 if {
	input.hygondcu.body.measure in query_reference_value("hygondcu_measure")
}
