# Keybroker default attestation policy for CPU TEEs (policy id "default", class "cpu").
#
# It maps verified evidence claims to the EAR trustworthiness vector. Values follow AR4SI:
# 2-31 affirming, 32-95 warning, 96-127 contraindicated. Without matching reference values a
# guest stays contraindicated: executables 33 (unknown code), hardware 97 (unrecognized
# platform), configuration 36 (unsafe or unknown configuration).
#
# query_reference_value(id) returns the reference values registered under `id` (or null).
package policy

import rego.v1

default executables := 33

default hardware := 97

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

# --- sample: the software stand-in TEE ---------------------------------------------------

executables := 3 if {
	input.sample.launch_digest in query_reference_value("launch_digest")
}

hardware := 2 if {
	input.sample.svn in query_reference_value("svn")
	input.sample.platform_version.major == query_reference_value("major_version")
	input.sample.platform_version.minor >= query_reference_value("minimum_minor_version")
}

configuration := 2 if {
	input.sample
	input.sample.debug == false
}

# --- tdx: Intel TDX (claims of keybroker.verifiers.tdx_claims plus the collateral) ------
#
# Reference value ids: mr_td (TD firmware), mr_seam (TDX module), rtmr_1 and rtmr_2 (kernel,
# initrd and command line), xfam (enabled CPU features).

executables := 3 if {
	input.tdx.quote.body.rtmr_1 in query_reference_value("rtmr_1")
	input.tdx.quote.body.rtmr_2 in query_reference_value("rtmr_2")
}

hardware := 2 if {
	input.tdx.quote.header.tee_type == "81000000"
	input.tdx.quote.header.vendor_id == intel_qe_vendor_id
	input.tdx.quote.body.mr_td in query_reference_value("mr_td")
	input.tdx.tcb_status == "UpToDate"
	input.tdx.collateral_expiration_status == "0"
}

# A debug TD's memory is readable by the host: never trusted, whatever else matches.
configuration := 96 if {
	input.tdx.td_attributes.debug == true
} else := 2 if {
	input.tdx.td_attributes.debug == false
	input.tdx.quote.body.xfam in query_reference_value("xfam")
}

# --- sgx: Intel SGX enclaves ---------------------------------------------------------------
#
# Reference value ids: mr_enclave, mr_signer.

executables := 3 if {
	input.sgx.body.mr_enclave in query_reference_value("mr_enclave")
	input.sgx.body.mr_signer in query_reference_value("mr_signer")
}

hardware := 2 if {
	input.sgx.header.vendor_id == intel_qe_vendor_id
	input.sgx.tcb_status == "UpToDate"
	input.sgx.collateral_expiration_status == "0"
}

# The DEBUG attribute is bit 1 of the first byte of attributes.flags (hex, little endian).
sgx_debug_bytes := {sprintf("%02x", [n]) | some n in numbers.range(0, 255); bits.and(n, 2) == 2}

configuration := 96 if {
	substring(input.sgx.body["attributes.flags"], 0, 2) in sgx_debug_bytes
} else := 2 if {
	input.sgx.body["attributes.flags"]
}

intel_qe_vendor_id := "939a7233f79c4ca9940a0db3957f0607"

# --- workload identifiers from the init-data agent policy -------------------------------

extensions := [{
	"name": "ear.trustee.identifiers",
	"key": -18,
	"value": {"validated": validated_identifiers},
}]

validated_identifiers := object.union(images, uids)

# In the agent policy's order (an array comprehension keeps it; a set would sort).
image_names := [name |
	some container in input.init_data_claims.agent_policy_claims.containers
	name := container.OCI.Annotations["io.kubernetes.cri.image-name"]
]

user_ids := [uid |
	some container in input.init_data_claims.agent_policy_claims.containers
	uid := container.OCI.Process.User.UID
]

images := {"container_images": image_names} if count(image_names) > 0

else := {}

uids := {"container_uids": user_ids} if count(user_ids) > 0

else := {}
