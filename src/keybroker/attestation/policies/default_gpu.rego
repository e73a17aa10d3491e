# Keybroker default attestation policy for devices (policy id "default", class "gpu").
#
# Without matching reference values a device stays contraindicated (hardware 97).
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

# --- sampledevice: the software stand-in device ------------------------------------------

hardware := 2 if {
	input.sampledevice.svn in query_reference_value("device_svn")
}

executables := 3 if input.sampledevice

configuration := 2 if input.sampledevice
