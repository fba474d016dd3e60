import Basics
import Memory

/// Loads a flat binary, the simplest guest there is: raw machine code with no header.
///
/// The convention is the one a PC BIOS uses for a boot sector, without the BIOS:
/// the file is copied to guest-physical ``loadAddress`` (0x7C00) and the boot vCPU
/// starts in 16-bit real mode with `CS:IP = 0000:7C00`, `DS = ES = FS = GS = SS = 0`,
/// `SP = 0x7C00` (the stack grows down below the code), interrupts disabled and every
/// other general register zero. There are no BIOS services: a guest talks to the
/// serial port and the exit port directly with `in`/`out`.
public enum FlatBinary {
    public static let loadAddress: GuestAddress = 0x7C00

    public enum LoadError: Error, Equatable, CustomStringConvertible {
        case empty
        case tooLarge(size: Int, available: UInt64)

        public var description: String {
            switch self {
            case .empty: return "the flat binary is empty"
            case let .tooLarge(size, available):
                return "the flat binary (\(size) bytes) does not fit in guest memory above 0x7c00 (\(available) bytes free)"
            }
        }
    }

    /// Copies `image` into `memory` and returns the entry state.
    public static func load(_ image: [UInt8], into memory: GuestMemory) throws(LoadError) -> EntryState {
        guard !image.isEmpty else { throw .empty }
        let available = memory.regions[0].size > loadAddress ? memory.regions[0].size - loadAddress : 0
        guard UInt64(image.count) <= available else { throw .tooLarge(size: image.count, available: available) }
        do { try memory.write(image, at: loadAddress) } catch { throw .tooLarge(size: image.count, available: available) }
        var state = EntryState()
        state.cs = .realMode(0, code: true)
        state.setDataSegments(.realMode(0))
        state.rip = loadAddress
        state.rsp = loadAddress
        return state
    }
}
