import Basics
import Compression
import Glibc
import Sandbox

/// Where the machine's threads are confined, in one place: a device's threads come from a
/// reserve started with the VM (a confined vCPU thread activates the device, and may not
/// start threads); each reserved thread confines itself as its kind before it waits.
enum SandboxedThreads {
    /// A starter for a device's session threads: on demand when the sandbox is off, else
    /// a reserve of `groups` (names and their kind), each confined as its kind.
    static func starter(_ sandbox: Sandbox, _ groups: [([String], ThreadKind)]) throws(ThreadStartError) -> ThreadStarter {
        guard sandbox.mode != .off else { return .onDemand }
        var kindByName: [String: ThreadKind] = [:]
        for (names, kind) in groups { for name in names { kindByName[name] = kind } }
        let kinds = kindByName
        let reserve = try ThreadReserve(names: groups.flatMap(\.0)) { name in
            sandbox.confineOrExit(kinds[name]!)
        }
        let hook = forbiddenCallHook
        return ThreadStarter { (name, body) throws(ThreadStartError) in
            try reserve.run(name: name) {
                if hook == name { Sandbox.makeForbiddenCall() }
                body()
            }
        }
    }

    /// What must happen before any thread is confined, because no filter allows it later:
    /// libdeflate is loaded (`dlopen` opens files), so a confined disk worker can inflate
    /// compressed qcow2 clusters with it.
    static func prepareProcess(_ sandbox: Sandbox) {
        guard sandbox.mode != .off else { return }
        _ = LibDeflate.shared
    }

    /// Test hook: the thread of this name makes a forbidden system call (an ioctl it may not
    /// make) when its device session starts it. Set by the environment variable
    /// SWIFTLET_SANDBOX_TEST_FORBIDDEN_CALL; the sandbox tests use it to see a violation end
    /// the VM with its message.
    static let forbiddenCallHook: String? = {
        guard let value = getenv("SWIFTLET_SANDBOX_TEST_FORBIDDEN_CALL") else { return nil }
        return String(cString: value)
    }()

    /// Confines the calling thread (vCPU, event loop, control) and fires the test hook for it.
    static func confine(_ sandbox: Sandbox, _ kind: ThreadKind, name: String) {
        sandbox.confineOrExit(kind)
        if sandbox.mode != .off, forbiddenCallHook == name { Sandbox.makeForbiddenCall() }
    }
}
