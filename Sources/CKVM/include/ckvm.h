// CKVM: the one C shim between Swiftlet and <linux/kvm.h>.
//
// Swift cannot use the ioctl request macros (they are function-like macros built from
// _IOW/_IOR) nor call the variadic ioctl(2). This header exports each request number
// Swiftlet issues as a constant, and fixed-arity wrappers; on the Swift side every call
// goes through KVMFileDescriptor.issue (Sources/KVM/FileDescriptor.swift), so error
// handling lives in one place. A request number is added here together with its wrapper.
#pragma once

#include <stdint.h>
#include <stddef.h>
#include <signal.h>
#include <linux/kvm.h>

// --- Request numbers (system, VM and vCPU ioctls) ----------------------------------
static const unsigned long CKVM_GET_API_VERSION = KVM_GET_API_VERSION;
static const unsigned long CKVM_CREATE_VM = KVM_CREATE_VM;
static const unsigned long CKVM_CHECK_EXTENSION = KVM_CHECK_EXTENSION;
static const unsigned long CKVM_GET_VCPU_MMAP_SIZE = KVM_GET_VCPU_MMAP_SIZE;
static const unsigned long CKVM_GET_SUPPORTED_CPUID = KVM_GET_SUPPORTED_CPUID;

static const unsigned long CKVM_SET_USER_MEMORY_REGION = KVM_SET_USER_MEMORY_REGION;
static const unsigned long CKVM_GET_DIRTY_LOG = KVM_GET_DIRTY_LOG;
static const unsigned long CKVM_SET_TSS_ADDR = KVM_SET_TSS_ADDR;
static const unsigned long CKVM_SET_IDENTITY_MAP_ADDR = KVM_SET_IDENTITY_MAP_ADDR;
static const unsigned long CKVM_CREATE_IRQCHIP = KVM_CREATE_IRQCHIP;
static const unsigned long CKVM_IRQ_LINE = KVM_IRQ_LINE;
static const unsigned long CKVM_CREATE_PIT2 = KVM_CREATE_PIT2;
static const unsigned long CKVM_GET_IRQCHIP = KVM_GET_IRQCHIP;
static const unsigned long CKVM_GET_PIT2 = KVM_GET_PIT2;
static const unsigned long CKVM_SET_PIT2 = KVM_SET_PIT2;
static const unsigned long CKVM_GET_CLOCK = KVM_GET_CLOCK;
static const unsigned long CKVM_SET_CLOCK = KVM_SET_CLOCK;
static const unsigned long CKVM_GET_DEBUGREGS = KVM_GET_DEBUGREGS;
static const unsigned long CKVM_SET_DEBUGREGS = KVM_SET_DEBUGREGS;
static const unsigned long CKVM_GET_XCRS = KVM_GET_XCRS;
static const unsigned long CKVM_SET_XCRS = KVM_SET_XCRS;
static const unsigned long CKVM_GET_MSR_INDEX_LIST = KVM_GET_MSR_INDEX_LIST;
static const unsigned long CKVM_SET_IRQCHIP = KVM_SET_IRQCHIP;
static const unsigned long CKVM_CREATE_VCPU = KVM_CREATE_VCPU;
static const unsigned long CKVM_ENABLE_CAP = KVM_ENABLE_CAP;
static const unsigned long CKVM_IOEVENTFD = KVM_IOEVENTFD;
static const unsigned long CKVM_IRQFD = KVM_IRQFD;
static const unsigned long CKVM_SET_GSI_ROUTING = KVM_SET_GSI_ROUTING;
static const unsigned long CKVM_SIGNAL_MSI = KVM_SIGNAL_MSI;

static const unsigned long CKVM_RUN = KVM_RUN;
static const unsigned long CKVM_GET_REGS = KVM_GET_REGS;
static const unsigned long CKVM_SET_REGS = KVM_SET_REGS;
static const unsigned long CKVM_GET_SREGS = KVM_GET_SREGS;
static const unsigned long CKVM_SET_SREGS = KVM_SET_SREGS;
static const unsigned long CKVM_SET_CPUID2 = KVM_SET_CPUID2;
static const unsigned long CKVM_GET_CPUID2 = KVM_GET_CPUID2;
static const unsigned long CKVM_GET_MSRS = KVM_GET_MSRS;
static const unsigned long CKVM_SET_MSRS = KVM_SET_MSRS;
static const unsigned long CKVM_GET_FPU = KVM_GET_FPU;
static const unsigned long CKVM_SET_FPU = KVM_SET_FPU;
static const unsigned long CKVM_GET_LAPIC = KVM_GET_LAPIC;
static const unsigned long CKVM_SET_LAPIC = KVM_SET_LAPIC;
static const unsigned long CKVM_GET_VCPU_EVENTS = KVM_GET_VCPU_EVENTS;
static const unsigned long CKVM_SET_VCPU_EVENTS = KVM_SET_VCPU_EVENTS;
static const unsigned long CKVM_TRANSLATE = KVM_TRANSLATE;
static const unsigned long CKVM_GET_XSAVE = KVM_GET_XSAVE;
static const unsigned long CKVM_GET_XSAVE2 = KVM_GET_XSAVE2;
static const unsigned long CKVM_SET_XSAVE = KVM_SET_XSAVE;
static const unsigned long CKVM_GET_MP_STATE = KVM_GET_MP_STATE;
static const unsigned long CKVM_SET_MP_STATE = KVM_SET_MP_STATE;
static const unsigned long CKVM_GET_TSC_KHZ = KVM_GET_TSC_KHZ;
static const unsigned long CKVM_SET_TSC_KHZ = KVM_SET_TSC_KHZ;
static const unsigned long CKVM_KVMCLOCK_CTRL = KVM_KVMCLOCK_CTRL;

// --- Capabilities we ask about -------------------------------------------------------
static const int CKVM_CAP_IRQCHIP = KVM_CAP_IRQCHIP;
static const int CKVM_CAP_USER_MEMORY = KVM_CAP_USER_MEMORY;
static const int CKVM_CAP_SET_TSS_ADDR = KVM_CAP_SET_TSS_ADDR;
static const int CKVM_CAP_PIT2 = KVM_CAP_PIT2;
static const int CKVM_CAP_IRQFD = KVM_CAP_IRQFD;
static const int CKVM_CAP_IOEVENTFD = KVM_CAP_IOEVENTFD;
static const int CKVM_CAP_IMMEDIATE_EXIT = KVM_CAP_IMMEDIATE_EXIT;
static const int CKVM_CAP_NR_VCPUS = KVM_CAP_NR_VCPUS;
static const int CKVM_CAP_MAX_VCPUS = KVM_CAP_MAX_VCPUS;
static const int CKVM_CAP_GET_TSC_KHZ = KVM_CAP_GET_TSC_KHZ;
static const int CKVM_CAP_TSC_CONTROL = KVM_CAP_TSC_CONTROL;
static const int CKVM_CAP_KVMCLOCK_CTRL = KVM_CAP_KVMCLOCK_CTRL;
static const int CKVM_CAP_EXT_CPUID = KVM_CAP_EXT_CPUID;
static const int CKVM_CAP_SIGNAL_MSI = KVM_CAP_SIGNAL_MSI;
static const int CKVM_CAP_READONLY_MEM = KVM_CAP_READONLY_MEM;
static const int CKVM_CAP_NR_MEMSLOTS = KVM_CAP_NR_MEMSLOTS;
static const int CKVM_CAP_XSAVE = KVM_CAP_XSAVE;
static const int CKVM_CAP_XSAVE2 = KVM_CAP_XSAVE2;
static const int CKVM_CAP_VCPU_EVENTS = KVM_CAP_VCPU_EVENTS;
static const int CKVM_CAP_INTERNAL_ERROR_DATA = KVM_CAP_INTERNAL_ERROR_DATA;
static const int CKVM_CAP_EXIT_ON_EMULATION_FAILURE = KVM_CAP_EXIT_ON_EMULATION_FAILURE;

static const int CKVM_CAP_IRQ_ROUTING = KVM_CAP_IRQ_ROUTING;
static const int CKVM_API_VERSION_EXPECTED = KVM_API_VERSION;

// --- Flags of the fast-path ioctls ------------------------------------------------------
static const uint32_t CKVM_IOEVENTFD_FLAG_DATAMATCH = KVM_IOEVENTFD_FLAG_DATAMATCH;
static const uint32_t CKVM_IOEVENTFD_FLAG_PIO = KVM_IOEVENTFD_FLAG_PIO;
static const uint32_t CKVM_IOEVENTFD_FLAG_DEASSIGN = KVM_IOEVENTFD_FLAG_DEASSIGN;
static const uint32_t CKVM_IRQFD_FLAG_DEASSIGN = KVM_IRQFD_FLAG_DEASSIGN;
static const uint32_t CKVM_IRQFD_FLAG_RESAMPLE = KVM_IRQFD_FLAG_RESAMPLE;
static const uint32_t CKVM_IRQCHIP_IOAPIC = KVM_IRQCHIP_IOAPIC;
static const uint32_t CKVM_CLOCK_TSC_STABLE = KVM_CLOCK_TSC_STABLE;

// --- Memory slot flags (struct kvm_userspace_memory_region.flags) ------------------------
static const uint32_t CKVM_MEM_LOG_DIRTY_PAGES = KVM_MEM_LOG_DIRTY_PAGES;
static const uint32_t CKVM_MEM_READONLY = KVM_MEM_READONLY;

// --- The vCPU's shared mapping ----------------------------------------------------------
/// Which page of the vCPU mapping holds the data of a KVM_EXIT_IO exit (KVM points
/// io.data_offset there), and where the coalesced-MMIO ring page is.
static const uint32_t CKVM_PIO_PAGE_OFFSET = KVM_PIO_PAGE_OFFSET;
static const uint32_t CKVM_COALESCED_MMIO_PAGE_OFFSET = KVM_COALESCED_MMIO_PAGE_OFFSET;

// --- Exit reasons ----------------------------------------------------------------------
static const uint32_t CKVM_EXIT_UNKNOWN = KVM_EXIT_UNKNOWN;
static const uint32_t CKVM_EXIT_EXCEPTION = KVM_EXIT_EXCEPTION;
static const uint32_t CKVM_EXIT_IO = KVM_EXIT_IO;
static const uint32_t CKVM_EXIT_HYPERCALL = KVM_EXIT_HYPERCALL;
static const uint32_t CKVM_EXIT_DEBUG = KVM_EXIT_DEBUG;
static const uint32_t CKVM_EXIT_HLT = KVM_EXIT_HLT;
static const uint32_t CKVM_EXIT_MMIO = KVM_EXIT_MMIO;
static const uint32_t CKVM_EXIT_IRQ_WINDOW_OPEN = KVM_EXIT_IRQ_WINDOW_OPEN;
static const uint32_t CKVM_EXIT_SHUTDOWN = KVM_EXIT_SHUTDOWN;
static const uint32_t CKVM_EXIT_FAIL_ENTRY = KVM_EXIT_FAIL_ENTRY;
static const uint32_t CKVM_EXIT_INTR = KVM_EXIT_INTR;
static const uint32_t CKVM_EXIT_INTERNAL_ERROR = KVM_EXIT_INTERNAL_ERROR;
static const uint32_t CKVM_EXIT_SYSTEM_EVENT = KVM_EXIT_SYSTEM_EVENT;
static const uint8_t CKVM_EXIT_IO_IN = KVM_EXIT_IO_IN;
static const uint8_t CKVM_EXIT_IO_OUT = KVM_EXIT_IO_OUT;
static const uint32_t CKVM_SYSTEM_EVENT_SHUTDOWN = KVM_SYSTEM_EVENT_SHUTDOWN;
static const uint32_t CKVM_SYSTEM_EVENT_RESET = KVM_SYSTEM_EVENT_RESET;
static const uint32_t CKVM_SYSTEM_EVENT_CRASH = KVM_SYSTEM_EVENT_CRASH;

static const uint32_t CKVM_MP_STATE_RUNNABLE = KVM_MP_STATE_RUNNABLE;
static const uint32_t CKVM_MP_STATE_UNINITIALIZED = KVM_MP_STATE_UNINITIALIZED;
static const uint32_t CKVM_MP_STATE_INIT_RECEIVED = KVM_MP_STATE_INIT_RECEIVED;
static const uint32_t CKVM_MP_STATE_HALTED = KVM_MP_STATE_HALTED;
static const uint32_t CKVM_MP_STATE_SIPI_RECEIVED = KVM_MP_STATE_SIPI_RECEIVED;

// KVM_EXIT_INTERNAL_ERROR suberror for "the instruction emulator failed", and the flag
// saying its data carries the instruction bytes (struct kvm_run.emulation_failure).
static const uint32_t CKVM_INTERNAL_ERROR_EMULATION = KVM_INTERNAL_ERROR_EMULATION;
static const uint64_t CKVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES = KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES;

// struct kvm_vcpu_events.flags: which optional fields KVM_SET_VCPU_EVENTS applies.
static const uint32_t CKVM_VCPUEVENT_VALID_SHADOW = KVM_VCPUEVENT_VALID_SHADOW;

static const uint32_t CKVM_PIT_SPEAKER_DUMMY = KVM_PIT_SPEAKER_DUMMY;
static const uint32_t CKVM_IRQCHIP_PIC_MASTER = KVM_IRQCHIP_PIC_MASTER;
static const uint32_t CKVM_IRQCHIP_PIC_SLAVE = KVM_IRQCHIP_PIC_SLAVE;

// --- Fixed-arity ioctl wrappers ---------------------------------------------------------
// Each returns ioctl's result: >= 0 on success, -1 with errno set on failure.

/// ioctl with an integer argument (KVM_CREATE_VCPU, KVM_CHECK_EXTENSION, KVM_SET_TSS_ADDR;
/// 0 for the requests that take none, such as KVM_RUN and KVM_CREATE_IRQCHIP).
int ckvm_ioctl_value(int fd, unsigned long request, unsigned long value);
/// ioctl with a pointer argument (structures in and out).
int ckvm_ioctl_pointer(int fd, unsigned long request, void *argument);

// --- Variable-length structures -----------------------------------------------------------
// kvm_cpuid2 and kvm_msrs end in flexible arrays; Swift allocates them through these helpers.

/// Size in bytes of a struct kvm_cpuid2 with room for `count` entries.
size_t ckvm_cpuid2_size(uint32_t count);
/// Size in bytes of a struct kvm_msr_list with room for `count` indices.
size_t ckvm_msr_list_size(uint32_t count);
/// Size in bytes of a struct kvm_msrs with room for `count` entries.
size_t ckvm_msrs_size(uint32_t count);

// --- GSI routing ---------------------------------------------------------------------------
// struct kvm_irq_routing ends in a flexible array of entries whose payload is a union.

/// Size in bytes of a struct kvm_irq_routing with room for `count` entries.
size_t ckvm_irq_routing_size(uint32_t count);
/// Entry `index`: GSI `gsi` goes to pin `pin` of in-kernel irqchip `chip` (PIC master,
/// PIC slave or IOAPIC).
void ckvm_irq_routing_set_irqchip(struct kvm_irq_routing *routing, uint32_t index, uint32_t gsi, uint32_t chip, uint32_t pin);
/// Entry `index`: GSI `gsi` is a message-signalled interrupt with this address and data.
void ckvm_irq_routing_set_msi(struct kvm_irq_routing *routing, uint32_t index, uint32_t gsi, uint64_t address, uint32_t data);

// --- Dirty log ------------------------------------------------------------------------------
// struct kvm_dirty_log holds its bitmap pointer in an anonymous union.

/// A KVM_GET_DIRTY_LOG request for memory slot `slot`, filling `bitmap` (one bit per page
/// of the slot, in 64-bit words).
static inline struct kvm_dirty_log ckvm_dirty_log_request(uint32_t slot, uint64_t *bitmap) {
    struct kvm_dirty_log log = {0};
    log.slot = slot;
    log.dirty_bitmap = bitmap;
    return log;
}

// --- kvm_run accessors ---------------------------------------------------------------------
// struct kvm_run's exit data is an anonymous union; these keep the union layout in C.
struct kvm_run;
/// Pointer to the data of a KVM_EXIT_IO exit: io.data_offset bytes into the run area.
static inline uint8_t *ckvm_run_io_data(struct kvm_run *run) {
    return (uint8_t *)run + run->io.data_offset;
}

/// The data bytes of a KVM_EXIT_MMIO exit (mmio.data, 8 bytes, in the run area's union).
static inline uint8_t *ckvm_run_mmio_data(struct kvm_run *run) {
    return run->mmio.data;
}

// --- Signals ------------------------------------------------------------------------------------
/// Installs a no-op handler (without SA_RESTART) for `signal`, so that sending it to a vCPU
/// thread interrupts KVM_RUN with EINTR instead of killing the process.
int ckvm_install_kick_handler(int signal);
/// The signal Swiftlet uses to kick vCPU threads out of KVM_RUN (SIGRTMIN + 1).
int ckvm_kick_signal(void);

// --- Host CPU ----------------------------------------------------------------------------------
/// The MXCSR bits this CPU lets software set (the MXCSR_MASK field FXSAVE stores, or the
/// architectural default 0xFFBF when it stores 0). A guest's LDMXCSR runs on this CPU, so
/// these are the bits hardware accepts from the guest too.
uint32_t ckvm_host_mxcsr_mask(void);
/// CPUID of the host CPU for `leaf`/`subleaf` into registers[0..3] = EAX, EBX, ECX, EDX
/// (all zero above the highest leaf). What the CPU itself implements, which is what
/// decides how hardware runs a guest's instructions, whatever the guest's CPUID says.
void ckvm_host_cpuid(uint32_t leaf, uint32_t subleaf, uint32_t registers[4]);

