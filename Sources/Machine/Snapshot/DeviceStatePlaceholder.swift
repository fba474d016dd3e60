// Replaced by Board+DeviceState.swift (branch device-state) when it lands.
struct BoardDeviceState: Codable, Sendable, Equatable {}
extension Board {
    func saveDeviceState() -> BoardDeviceState { BoardDeviceState() }
    func restoreDeviceState(_ state: BoardDeviceState) throws(MachineError) {}
}
