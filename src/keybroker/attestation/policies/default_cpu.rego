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

# The DEBUG attribute is bit 1 of the first byte of attributes.flags (hex, little endian):
# bit 1 of that byte's low nibble, its second hex digit. (A set of all 128 matching bytes,
# built by a comprehension, cost 10 ms per evaluation.)
sgx_debug_nibbles := {"2", "3", "6", "7", "a", "b", "e", "f", "A", "B", "E", "F"}

configuration := 96 if {
	substring(input.sgx.body["attributes.flags"], 1, 1) in sgx_debug_nibbles
} else := 2 if {
	input.sgx.body["attributes.flags"]
}

intel_qe_vendor_id := "939a7233f79c4ca9940a0db3957f0607"

# --- cca: Arm CCA realms (claims of keybroker.verifiers.arm.cca) -------------------------
#
# The verifier has already required the platform's CPAK in the trust-anchor store and its
# firmware in the CCA rv-store. Reference value id, as upstream's CCA example policy:
# cca.realm.cca-realm-initial-measurement (the RIM, base64).

executables := 3 if {
	input.cca.realm["cca-realm-initial-measurement"] in query_reference_value("cca.realm.cca-realm-initial-measurement")
}

hardware := 2 if cca_secured

# Only the PSA "secured" lifecycle (0x3000-0x30ff) locks the platform's debug ports and
# provisioning; in a debug, test or decommissioned state its secrets are not protected.
configuration := 96 if {
	input.cca
	not cca_secured
} else := 2 if {
	cca_secured
}

cca_secured if {
	lifecycle := input.cca.platform["cca-platform-lifecycle"]
	lifecycle >= 12288
	lifecycle <= 12543
}

# --- snp: AMD SEV-SNP (claims of keybroker.verifiers.snp) ----------------------------------
#
# Reference value ids, as upstream's: snp_launch_measurement; snp_bootloader, snp_tee_svn,
# snp_snp_svn, snp_microcode (the reported TCB); snp_smt_enabled, snp_tsme_enabled,
# snp_guest_abi_major, snp_guest_abi_minor, snp_single_socket, snp_smt_allowed.

executables := 3 if {
	input.snp.measurement in query_reference_value("snp_launch_measurement")
}

hardware := 2 if {
	reference_matches(input.snp.reported_tcb_bootloader, query_reference_value("snp_bootloader"))
	reference_matches(input.snp.reported_tcb_tee, query_reference_value("snp_tee_svn"))
	reference_matches(input.snp.reported_tcb_snp, query_reference_value("snp_snp_svn"))
	reference_matches(input.snp.reported_tcb_microcode, query_reference_value("snp_microcode"))
}

# A guest whose policy lets the host debug it is readable by the host: never trusted.
configuration := 96 if {
	input.snp.policy_debug_allowed == true
} else := 2 if {
	input.snp.policy_migrate_ma == false
	reference_matches(input.snp.platform_smt_enabled, query_reference_value("snp_smt_enabled"))
	reference_matches(input.snp.platform_tsme_enabled, query_reference_value("snp_tsme_enabled"))
	reference_matches(input.snp.policy_abi_major, query_reference_value("snp_guest_abi_major"))
	reference_matches(input.snp.policy_abi_minor, query_reference_value("snp_guest_abi_minor"))
	reference_matches(input.snp.policy_single_socket, query_reference_value("snp_single_socket"))
	reference_matches(input.snp.policy_smt_allowed, query_reference_value("snp_smt_allowed"))
} else := 3 if {
	# no debugging and no migration agent: no known weakness, but not a reviewed config
	input.snp.policy_debug_allowed == false
	input.snp.policy_migrate_ma == false
}

# --- az-snp-vtpm: Azure confidential VMs on SEV-SNP (SNP claims plus tpm.pcrNN) ----------
#
# The claims sit under the TEE's name, "az-snp-vtpm". As upstream's, every SNP claim of this
# TEE is a string: numbers in decimal, flags "true" / "false", the measurement in base64.
# Reference value ids as upstream's: measurement, snp_pcr11, tcb_bootloader, tcb_tee, tcb_snp,
# tcb_microcode, smt_enabled, tsme_enabled, abi_major, abi_minor, single_socket, smt_allowed.

az_snp := input["az-snp-vtpm"]

executables := 3 if {
	az_snp.measurement in query_reference_value("measurement")
	az_snp.tpm.pcr11 in query_reference_value("snp_pcr11")
}

hardware := 2 if {
	reference_matches(az_snp.reported_tcb_bootloader, query_reference_value("tcb_bootloader"))
	reference_matches(az_snp.reported_tcb_tee, query_reference_value("tcb_tee"))
	reference_matches(az_snp.reported_tcb_snp, query_reference_value("tcb_snp"))
	reference_matches(az_snp.reported_tcb_microcode, query_reference_value("tcb_microcode"))
}

configuration := 96 if {
	az_snp.policy_debug_allowed == "true"
} else := 2 if {
	az_snp.policy_debug_allowed == "false"
	reference_matches(az_snp.platform_smt_enabled, query_reference_value("smt_enabled"))
	reference_matches(az_snp.platform_tsme_enabled, query_reference_value("tsme_enabled"))
	reference_matches(az_snp.policy_abi_major, query_reference_value("abi_major"))
	reference_matches(az_snp.policy_abi_minor, query_reference_value("abi_minor"))
	reference_matches(az_snp.policy_single_socket, query_reference_value("single_socket"))
	reference_matches(az_snp.policy_smt_allowed, query_reference_value("smt_allowed"))
}

# --- az-tdx-vtpm: Azure confidential VMs on TDX (TDX claims plus tpm.pcrNN) --------------
#
# Reference value ids as upstream's: tdx_pcr11, mr_seam, tcb_svn, mr_td, xfam.

az_tdx := input["az-tdx-vtpm"]

executables := 3 if {
	az_tdx.tpm.pcr11 in query_reference_value("tdx_pcr11")
}

hardware := 2 if {
	az_tdx.quote.header.tee_type == "81000000"
	az_tdx.quote.header.vendor_id == intel_qe_vendor_id
	az_tdx.quote.body.mr_seam in query_reference_value("mr_seam")
	az_tdx.quote.body.tcb_svn in query_reference_value("tcb_svn")
	az_tdx.quote.body.mr_td in query_reference_value("mr_td")
	az_tdx.tcb_status == "UpToDate"
	az_tdx.collateral_expiration_status == "0"
}

configuration := 96 if {
	az_tdx.td_attributes.debug == true
} else := 2 if {
	az_tdx.td_attributes.debug == false
	az_tdx.quote.body.xfam in query_reference_value("xfam")
}

# --- tpm: a plain TPM 2.0 (claims of keybroker.verifiers.tpm.verifier: pcrNN, ak_public) --
#
# As upstream's: the verifier has already refused AKs outside trusted_ak_keys_dir; the policy
# may pin them again by reference value. Reference value ids: tpm_pcr11, trusted_aks.

hardware := 2 if {
	input.tpm
}

executables := 3 if {
	input.tpm.pcr11 in query_reference_value("tpm_pcr11")
	input.tpm.ak_public in query_reference_value("trusted_aks")
}

configuration := 0 if {
	input.tpm
}

# --- csv: Hygon CSV (claims of keybroker.verifiers.hygon.csv) ------------------------------
#
# Upstream Trustee's default policy has no CSV rules (a CSV guest stays contraindicated there).
# Reference value ids (ours, in the style of upstream's snp_ ids): csv_measure (the launch
# digest); csv_api_major, csv_api_minor (the firmware API version in the guest policy).

executables := 3 if {
	input.csv.measure in query_reference_value("csv_measure")
}

hardware := 2 if {
	reference_matches(input.csv.policy.api_major, query_reference_value("csv_api_major"))
	reference_matches(input.csv.policy.api_minor, query_reference_value("csv_api_minor"))
}

# NODBG clear: the host may debug (read) the guest: never trusted.
configuration := 96 if {
	input.csv.policy.nodbg == 0
} else := 3 if {
	input.csv.policy.nodbg == 1
}

# --- se: IBM Secure Execution for Linux (claims of keybroker.verifiers.ibm.se) -----------
#
# As upstream: the verifier has checked the Ultravisor's measurement, the host keys and the
# runtime-data binding, so a present `se` vouches for the executables and the hardware. The
# configuration is affirmed only when the measured image is the configured SE header and that
# header forbids dumping the guest (a dumpable guest's memory can leave the machine in clear);
# an unknown image keeps the default configuration value.

executables := 3 if {
	input.se
}

hardware := 2 if {
	input.se
}

configuration := 96 if {
	input.se.image_dump_allowed == true
} else := 2 if {
	input.se.image_dump_allowed == false
}

# A reference value registered as a list holds every accepted value; a scalar, the one.
# (Each caller names its reference value id literally, so only those ids are fetched.)
reference_matches(value, reference) if value in reference

reference_matches(value, reference) if value == reference

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
