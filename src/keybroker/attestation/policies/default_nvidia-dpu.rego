# Keybroker default attestation policy for NVIDIA BlueField DPUs (policy id "default", class
# "nvidia-dpu"; upstream ships none, so its AS cannot appraise a DPU without an operator policy).
#
# The verifier already proved the DICE chain to the configured root, a fresh Alias certificate
# and the signed session nonce. Reference value ids:
#   nvidia_dpu_accumulated_fwid  accepted SHA-384 digests over the DeviceID's firmware FWIDs
#   nvidia_dpu_device_class      accepted device classes (DeviceID CN), e.g. "bluefield3"
# Without them a DPU stays contraindicated.
package policy

import rego.v1

default hardware := 97

default executables := 33

default configuration := 36

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
	input.nvidiadpu.device_class in query_reference_value("nvidia_dpu_device_class")
}

executables := 3 if {
	input.nvidiadpu.firmware_layers_count > 0
	input.nvidiadpu.accumulated_fwid in query_reference_value("nvidia_dpu_accumulated_fwid")
}

configuration := 2 if {
	input.nvidiadpu.firmware_layers_count > 0
	input.nvidiadpu.accumulated_fwid in query_reference_value("nvidia_dpu_accumulated_fwid")
}
