# Keybroker default attestation policy for devices (policy id "default", class "gpu"):
# sampledevice and NVIDIA GPUs (local-mode claims, and upstream's rules for NRAS claims).
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

# --- nvidia, local mode: a Hopper report the verifier checked (keybroker.verifiers.nvidia) --
#
# The verifier already proved the report genuine: chained to NVIDIA's pinned root, signed by
# the device key, fwid matching, nonce bound. Reference value ids:
#   nvidia_gpu_measurements  "<index>:<hex>" entries from NVIDIA's driver and VBIOS RIMs; every
#                            index named there must report one of the values listed for it
#   allowed_vbios_versions   VBIOS versions (upstream's id), e.g. "96.00.9f.00.01"
#   allowed_driver_versions  driver versions (upstream's id), e.g. "550.90.07"
# A local-mode report carries no debug flag: the RIM comparison is the only check of its code.

nvidia_local_report if {
	input.nvidia.arch == "Hopper"
	is_object(input.nvidia.measurements)
	input.nvidia.config.fwid
}

nvidia_rim_indices contains split(entry, ":")[0] if {
	some entry in query_reference_value("nvidia_gpu_measurements")
}

hardware := 2 if nvidia_local_report

executables := 3 if {
	nvidia_local_report
	count(nvidia_rim_indices) > 0
	every index in nvidia_rim_indices {
		concat(":", [index, input.nvidia.measurements[index]]) in query_reference_value("nvidia_gpu_measurements")
	}
}

configuration := 2 if {
	nvidia_local_report
	input.nvidia.config.vbios_version in query_reference_value("allowed_vbios_versions")
	input.nvidia.config.driver_version in query_reference_value("allowed_driver_versions")
}

# --- nvidia, claims of NVIDIA's NRAS (upstream's rules, for remote-mode claims) -----------

hardware := 2 if {
	input.nvidia["x-nvidia-gpu-attestation-report-cert-chain"]["x-nvidia-cert-ocsp-status"] == "good"
	input.nvidia["x-nvidia-gpu-attestation-report-cert-chain"]["x-nvidia-cert-status"] == "valid"
	input.nvidia["x-nvidia-gpu-attestation-report-cert-chain-fwid-match"] == true
	input.nvidia["x-nvidia-gpu-attestation-report-parsed"] == true
	input.nvidia["x-nvidia-gpu-attestation-report-signature-verified"] == true
	input.nvidia["x-nvidia-gpu-arch-check"] == true
}

configuration := 2 if {
	input.nvidia.secboot == true
	input.nvidia.dbgstat == "disabled"
	input.nvidia["x-nvidia-gpu-vbios-version"] in query_reference_value("allowed_vbios_versions")
	input.nvidia["x-nvidia-gpu-driver-version"] in query_reference_value("allowed_driver_versions")
} else := 3 if {
	input.nvidia.secboot == true
	input.nvidia.dbgstat == "disabled"
}

executables := 3 if {
	input.nvidia["x-nvidia-gpu-vbios-rim-cert-chain"]["x-nvidia-cert-ocsp-status"] == "good"
	input.nvidia["x-nvidia-gpu-vbios-rim-cert-chain"]["x-nvidia-cert-status"] == "valid"
	nras_checks_pass("x-nvidia-gpu-driver-rim")
	nras_checks_pass("x-nvidia-gpu-vbios-rim")
	input.nvidia.measres == "success"
}

nras_checks_pass(prefix) if {
	every check in ["fetched", "measurements-available", "schema-validated", "signature-verified", "version-match"] {
		input.nvidia[concat("-", [prefix, check])] == true
	}
}
