# Keybroker default attestation policy for a protected-PCIe topology (policy id "default",
# class "ppcie"), doing what upstream's ear_default_policy_ppcie.rego does: a ppcie submodule
# exists only once a complete topology (8 GPUs, 4 switches) was found, so its configuration is
# affirmed; hardware and code are judged in each device's own submodule. The topology is found
# in NRAS claims only (remote mode), as upstream.
package policy

import rego.v1

trust_claims := {
	"instance-identity": 0,
	"configuration": 2,
	"executables": 0,
	"file-system": 0,
	"hardware": 0,
	"runtime-opaque": 0,
	"storage-opaque": 0,
	"sourced-data": 0,
}
