#define _GNU_SOURCE
#include "ckvm.h"

#include <sys/ioctl.h>
#include <string.h>
#include <cpuid.h>

// The Swift side mirrors none of these structs field by field (it uses the imported C
// types directly); these asserts pin the ABI the wrappers rely on.
_Static_assert(sizeof(struct kvm_userspace_memory_region) == 32, "kvm_userspace_memory_region layout");
_Static_assert(sizeof(struct kvm_dirty_log) == 16, "kvm_dirty_log layout");
_Static_assert(sizeof(struct kvm_regs) == 144, "kvm_regs layout");
_Static_assert(sizeof(struct kvm_segment) == 24, "kvm_segment layout");
_Static_assert(sizeof(struct kvm_sregs) == 312, "kvm_sregs layout");
_Static_assert(sizeof(struct kvm_cpuid_entry2) == 40, "kvm_cpuid_entry2 layout");
_Static_assert(sizeof(struct kvm_msr_entry) == 16, "kvm_msr_entry layout");
_Static_assert(sizeof(struct kvm_irq_level) == 8, "kvm_irq_level layout");
_Static_assert(sizeof(struct kvm_pit_config) == 64, "kvm_pit_config layout");
_Static_assert(sizeof(struct kvm_mp_state) == 4, "kvm_mp_state layout");
_Static_assert(sizeof(struct kvm_pic_state) == 16, "kvm_pic_state layout");
_Static_assert(sizeof(struct kvm_irqchip) == 520, "kvm_irqchip layout");
_Static_assert(sizeof(struct kvm_debugregs) == 128, "kvm_debugregs layout");
_Static_assert(sizeof(struct kvm_xcrs) == 392, "kvm_xcrs layout");
_Static_assert(sizeof(struct kvm_pit_state2) == 112, "kvm_pit_state2 layout");
_Static_assert(sizeof(struct kvm_clock_data) == 48, "kvm_clock_data layout");
_Static_assert(sizeof(struct kvm_lapic_state) == 1024, "kvm_lapic_state layout");
_Static_assert(sizeof(struct kvm_ioeventfd) == 64, "kvm_ioeventfd layout");
_Static_assert(sizeof(struct kvm_irqfd) == 32, "kvm_irqfd layout");
_Static_assert(sizeof(struct kvm_irq_routing_entry) == 48, "kvm_irq_routing_entry layout");
_Static_assert(sizeof(struct kvm_msi) == 32, "kvm_msi layout");
_Static_assert(sizeof(struct kvm_vcpu_events) == 64, "kvm_vcpu_events layout");
_Static_assert(sizeof(struct kvm_translation) == 24, "kvm_translation layout");
_Static_assert(sizeof(struct kvm_fpu) == 416, "kvm_fpu layout");
_Static_assert(sizeof(struct kvm_xsave) == 4096, "kvm_xsave layout (KVM_GET_XSAVE's fixed size)");
_Static_assert(sizeof(struct kvm_enable_cap) == 104, "kvm_enable_cap layout");
// The emulation-failure view of kvm_run's union: flags in data[0], then insn_size and up
// to 15 instruction bytes in data[1..2] (KVM's ABI, see <linux/kvm.h>).
_Static_assert(offsetof(struct kvm_run, emulation_failure.flags) == offsetof(struct kvm_run, internal.data[0]), "emulation_failure.flags");
_Static_assert(offsetof(struct kvm_run, emulation_failure.insn_size) == offsetof(struct kvm_run, internal.data[1]), "emulation_failure.insn_size");

int ckvm_ioctl_value(int fd, unsigned long request, unsigned long value) {
    return ioctl(fd, request, value);
}

int ckvm_ioctl_pointer(int fd, unsigned long request, void *argument) {
    return ioctl(fd, request, argument);
}

size_t ckvm_cpuid2_size(uint32_t count) {
    return sizeof(struct kvm_cpuid2) + (size_t)count * sizeof(struct kvm_cpuid_entry2);
}

size_t ckvm_msr_list_size(uint32_t count) {
    return sizeof(struct kvm_msr_list) + (size_t)count * sizeof(uint32_t);
}

size_t ckvm_msrs_size(uint32_t count) {
    return sizeof(struct kvm_msrs) + (size_t)count * sizeof(struct kvm_msr_entry);
}

uint32_t ckvm_host_mxcsr_mask(void) {
    uint8_t area[512] __attribute__((aligned(16)));
    uint32_t mask;
    __asm__ volatile("fxsave %0" : "=m"(area));
    memcpy(&mask, area + 28, sizeof(mask));
    return mask != 0 ? mask : 0xFFBF;
}

void ckvm_host_cpuid(uint32_t leaf, uint32_t subleaf, uint32_t registers[4]) {
    unsigned int a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid_count(leaf, subleaf, &a, &b, &c, &d)) { a = b = c = d = 0; }
    registers[0] = a; registers[1] = b; registers[2] = c; registers[3] = d;
}



static void ckvm_kick_handler(int signal) {
    (void)signal;
}

int ckvm_install_kick_handler(int signal) {
    struct sigaction action;
    memset(&action, 0, sizeof(action));
    action.sa_handler = ckvm_kick_handler;
    sigemptyset(&action.sa_mask);
    action.sa_flags = 0; // no SA_RESTART: KVM_RUN must return EINTR
    return sigaction(signal, &action, NULL);
}

int ckvm_kick_signal(void) {
    return SIGRTMIN + 1;
}


size_t ckvm_irq_routing_size(uint32_t count) {
    return sizeof(struct kvm_irq_routing) + (size_t)count * sizeof(struct kvm_irq_routing_entry);
}

void ckvm_irq_routing_set_irqchip(struct kvm_irq_routing *routing, uint32_t index, uint32_t gsi, uint32_t chip, uint32_t pin) {
    struct kvm_irq_routing_entry *entry = &routing->entries[index];
    memset(entry, 0, sizeof(*entry));
    entry->gsi = gsi;
    entry->type = KVM_IRQ_ROUTING_IRQCHIP;
    entry->u.irqchip.irqchip = chip;
    entry->u.irqchip.pin = pin;
}

void ckvm_irq_routing_set_msi(struct kvm_irq_routing *routing, uint32_t index, uint32_t gsi, uint64_t address, uint32_t data) {
    struct kvm_irq_routing_entry *entry = &routing->entries[index];
    memset(entry, 0, sizeof(*entry));
    entry->gsi = gsi;
    entry->type = KVM_IRQ_ROUTING_MSI;
    entry->u.msi.address_lo = (uint32_t)address;
    entry->u.msi.address_hi = (uint32_t)(address >> 32);
    entry->u.msi.data = data;
}
